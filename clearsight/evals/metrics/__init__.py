"""Pure scoring functions: CHAIR and the CrossCheck aggregation."""
