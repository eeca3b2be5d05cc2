"""ppl.stdlib."""
