"""Performance planning: `cascade bench`, the memory planner and its report, the real IF architectures."""
