"""End-to-end tests on real Celery worker processes, Redis and PostgreSQL."""
