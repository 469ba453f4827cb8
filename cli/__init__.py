"""The `nkv` command line (click). Each command lives in its own module, loaded lazily."""
