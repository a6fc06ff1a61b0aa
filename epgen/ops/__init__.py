"""One module per operation family: which spec a call needs, its launch arguments, outputs."""
