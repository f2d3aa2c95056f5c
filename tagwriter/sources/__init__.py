"""Sources of values: simulated polling, files and stdin, an upstream queue."""
