"""Forwarding: images and reports back to the site PACS, with storage commitment."""
