"""Reading training pools and targets, chat formats, and tokenization with label masks (LESS.md section 1)."""
