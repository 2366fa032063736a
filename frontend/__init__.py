"""The HTTP frontend: Fooocus-API's REST contract in front of Triton."""
