from app.api.routes.files import file_router
from app.core.tables import DatasetFile

router = file_router("datasets", DatasetFile)
