"""Reports: model, SR/PDF documents, delivery to the site, critical findings, report templates, pages, CLI."""
