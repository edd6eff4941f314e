"""The co-design planner: a model described from its config, a cost model over hardware figures, and an exact
MILP that picks each tensor's format, the KV-cache format and each layer's placement."""
