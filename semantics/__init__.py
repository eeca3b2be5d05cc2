"""The meaning of ppl programs: the IR (core calculus), its exact measure semantics,
and its sampling semantics over particle batches."""
