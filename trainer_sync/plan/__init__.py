"""Pure planning: which bytes go where. buckets.py: every rank's pieces -> BucketPlan (buckets, rounds, owners),
checked against each receiver's Expected; delta_policy.py: whether a push may go as deltas, bucket geometry."""
