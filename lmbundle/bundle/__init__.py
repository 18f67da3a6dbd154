"""Bundle-level tools (the Apple bundle check)."""
