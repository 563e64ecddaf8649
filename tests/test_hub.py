"""Hub I/O without a network: push_to_hub with a recording API, loading by repo id from a local cache."""

import shutil

import huggingface_hub
import pytest
import yaml
from huggingface_hub import HfApi

from lavit_pipelines import LavitText2ImagePipeline, LavitUnderstandingPipeline

REPO_ID = "someone/lavit-tiny"


@pytest.fixture
def offline_cache(converted_dir, tmp_path, monkeypatch):
    """A Hugging Face cache holding REPO_ID at one revision, with the Hub switched off."""
    cache = tmp_path / "hub-cache"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    shutil.copytree(converted_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_text2image_pipeline_loads_by_repo_id(offline_cache):
    pipe = LavitText2ImagePipeline.from_pretrained(REPO_ID, cache_dir=offline_cache)
    assert pipe.visual_tokenizer is not None and pipe.unet is not None


def test_understanding_pipeline_loads_by_repo_id(offline_cache):
    pipe = LavitUnderstandingPipeline.from_pretrained(REPO_ID, cache_dir=offline_cache)
    assert pipe.visual_tokenizer is not None and pipe.language_model is not None


def test_download_fetches_only_the_pipelines_folders(monkeypatch):
    calls = {}

    def fake_snapshot_download(repo_id, **kwargs):
        calls.update(kwargs, repo_id=repo_id)
        return "/nowhere"

    monkeypatch.setattr("lavit_pipelines.pipelines.base.snapshot_download", fake_snapshot_download)
    LavitUnderstandingPipeline.download(REPO_ID, revision="v1", custom_pipeline=None)
    folders = {pattern.split("/")[0] for pattern in calls["allow_patterns"]}
    assert calls["repo_id"] == REPO_ID and calls["revision"] == "v1"
    assert folders == {"model_index.json", "tokenizer", "language_model", "visual_tokenizer"}
    assert not any(pattern.endswith(".bin") for pattern in calls["allow_patterns"])


def test_push_to_hub_uploads_folder_with_model_card(converted_dir, tmp_path, monkeypatch):
    uploaded = tmp_path / "uploaded"

    class Created:
        repo_id = REPO_ID

    def upload_folder(self, repo_id, folder_path, commit_message, create_pr):
        shutil.copytree(folder_path, uploaded)
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, private=None, exist_ok=False: Created())
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    pipe = LavitText2ImagePipeline.from_pretrained(converted_dir)
    assert pipe.push_to_hub(REPO_ID).endswith(REPO_ID)

    card = (uploaded / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["license"] == "llama2"
    assert metadata["pipeline_tag"] == "text-to-image"
    assert metadata["library_name"] == "lavit-pipelines"
    assert f'LavitText2ImagePipeline.from_pretrained("{REPO_ID}"' in card
    assert (uploaded / "model_index.json").is_file()
    assert any((uploaded / "unet").glob("*.safetensors"))
    reloaded = LavitText2ImagePipeline.from_pretrained(uploaded)
    assert reloaded.pixel_decoder.config.variant == "highres"
