"""Generation beyond generate(): the calculator tool and the tool-use engine."""
