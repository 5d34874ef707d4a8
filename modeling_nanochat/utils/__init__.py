"""Small shared plumbing: no imports from the rest of the package."""
