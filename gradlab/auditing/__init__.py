"""gradlab audit: the user's own, unchanged training loop against its big-batch twin."""
