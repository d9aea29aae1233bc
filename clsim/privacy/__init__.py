"""Privacy: the ledger of data accesses and the mechanisms that make gradients private."""
