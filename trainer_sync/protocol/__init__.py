"""What trainer ranks, receivers and engines say to each other (messages.py: JoinInfo, Expected, Verdict, the
store's key names) and what a push reports (report.py: SyncReport)."""
