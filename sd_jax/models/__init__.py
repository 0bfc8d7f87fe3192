"""Model zoo: networks built by name, dense or SD."""
