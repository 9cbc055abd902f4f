"""One router per resource; each calls the logic of its concept package (app/jobs, app/files, app/webhooks, ...)."""
