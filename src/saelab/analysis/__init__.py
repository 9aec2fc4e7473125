"""Using trained SAEs: feature statistics and dashboards, circuits, steering."""
