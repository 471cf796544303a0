"""Seed -> domain branches -> mix: sparse upcycling vs BTX vs BAM at matched compute; see README.md."""
