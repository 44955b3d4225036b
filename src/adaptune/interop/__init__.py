"""Other libraries' adapter formats: read and write them."""
