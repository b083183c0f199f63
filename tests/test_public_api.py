"""The names users import, and that optional back-ends stay optional."""
import subprocess
import sys


def test_public_names_import_without_optional_backends():
    code = (
        "import sys\n"
        "from models import CVNetGlobal, CVNetRerank, SuperGlobal, SuperGlobalRerank, load_official_checkpoint\n"
        "from datasets import PairedDataset\n"
        "from helpers import AbstractVectorDB, TensorVectorDB, FaissVectorDB, PineconeVectorDB\n"
        "assert issubclass(TensorVectorDB, AbstractVectorDB) and issubclass(FaissVectorDB, AbstractVectorDB)\n"
        "assert issubclass(PineconeVectorDB, AbstractVectorDB)\n"
        "print(sorted(m for m in ('faiss', 'pinecone') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", "faiss/pinecone must be imported lazily"
