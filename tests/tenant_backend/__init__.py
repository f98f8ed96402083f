"""A PostgreSQL backend that sets ``search_path`` on every new cursor, as schema-per-tenant
backends do (``ENGINE = "tests.tenant_backend"``): each cursor is a statement on the
connection before the caller's first one."""
