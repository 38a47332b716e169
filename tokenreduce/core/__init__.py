"""Pure tensor code shared by every reducer: schedules, matching, merging, per-pass state, MACs."""
