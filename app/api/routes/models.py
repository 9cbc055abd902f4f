from app.api.routes.files import file_router
from app.core.tables import Model

router = file_router("models", Model)
