"""The HTTP edge: routes, middleware (request id, errors, records), tenant auth."""
