"""`seedbed bench`: measurements kept apart from the library code they measure."""
