"""Writers for other engines' formats."""
