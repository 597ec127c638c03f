"""The pipeline's DVC stages: each reads the project, calls the domain, writes its outputs, talks to tracking."""
