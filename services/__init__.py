"""Ray Serve deployments and application wrapping the tracker library."""
