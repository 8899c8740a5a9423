"""Standing up a site: ``appliance init`` and ``appliance provision``."""
