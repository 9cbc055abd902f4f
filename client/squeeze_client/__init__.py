"""The Squeeze client: a Python API (`Client`) and the `squeeze` command, over HTTP only.

    pip install ./client          # httpx, typer, rich, pydantic, pyyaml: nothing of the server
    from squeeze_client import Client, Invalid
"""

from squeeze_client.client import TERMINAL, Client
from squeeze_client.config import ClientConfig, client_config
from squeeze_client.errors import (BadRequest, Conflict, Invalid, NotFound, ServerError, SqueezeError, TooLarge,
                                   Unauthorized, Unreachable, Unsupported, WaitTimeout)
from squeeze_client.webhooks import WebhookVerificationError, verify_webhook
from squeeze_client.wire import (ArtifactOut, Comparison, EventOut, FileOut, FilePage, JobError, JobOut, JobPage,
                                 KeyCreated, KeyOut, RecipeValidation, SweepOut, SweepPage, SweepSummary)

__all__ = ["TERMINAL", "ArtifactOut", "BadRequest", "Client", "ClientConfig", "Comparison", "Conflict", "EventOut",
           "FileOut", "FilePage", "Invalid", "JobError", "JobOut", "JobPage", "KeyCreated", "KeyOut", "NotFound",
           "RecipeValidation", "ServerError", "SqueezeError", "SweepOut", "SweepPage", "SweepSummary", "TooLarge",
           "Unauthorized", "Unreachable", "Unsupported", "WaitTimeout", "WebhookVerificationError", "client_config",
           "verify_webhook"]
