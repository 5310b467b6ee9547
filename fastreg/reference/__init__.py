"""Pure-PyTorch implementations of every fastreg op: the fallback and the test oracle."""
