"""The warehouse schema (schema.sql) and the views people query (views.sql); applied by tasks.core.warehouse."""
