"""Persons: the rules of the user's edits (service) and which question to ask next (suggest)."""
