"""Accounts: bcrypt passwords in an SQLite user store (work in progress)."""
