"""Transport: the rendezvous and the bridging process groups that carry buckets between trainer and receivers."""
