"""What users run on top: chat CLI, app backend, serve, publish, the report card."""
