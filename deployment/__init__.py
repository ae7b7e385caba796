"""Deployment of compressed models: real integer models, their storage and their runtimes."""
