from app.models import Dataset
from app.routes.files import file_router

router = file_router("datasets", Dataset)
