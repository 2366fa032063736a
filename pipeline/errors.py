class UnsupportedFeature(Exception):
    """A request asked for a Fooocus feature this server does not implement (yet); the job ends
    as ERROR with this message."""
