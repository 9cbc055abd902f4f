from app.api.routes.files import file_router
from app.core.tables import ModelFile

router = file_router("models", ModelFile)
