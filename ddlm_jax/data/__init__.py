"""Data: the embedded corpus, local and catalog text, tokenizers, rows and batches."""
from ddlm_jax.data.batching import BatchIterator
from ddlm_jax.data.batching import count_truncated
from ddlm_jax.data.batching import cut_rows
from ddlm_jax.data.batching import pack_documents
from ddlm_jax.data.batching import pack_stream
from ddlm_jax.data.batching import pad_documents
from ddlm_jax.data.batching import WindowIterator
from ddlm_jax.data.corpus import default_corpus
from ddlm_jax.data.corpus import Document
from ddlm_jax.data.corpus import RestaurantCorpus
from ddlm_jax.data.corpus import split_seed
from ddlm_jax.data.datasets import DataBundle
from ddlm_jax.data.datasets import DataConfig
from ddlm_jax.data.datasets import load_data
from ddlm_jax.data.datasets import train_batches
from ddlm_jax.data.local_text import load_catalog_texts
from ddlm_jax.data.local_text import load_local_texts
from ddlm_jax.data.local_text import LocalText
from ddlm_jax.data.tokenizers import BOS_ID
from ddlm_jax.data.tokenizers import build_tokenizer
from ddlm_jax.data.tokenizers import CharTokenizer
from ddlm_jax.data.tokenizers import encode_stream
from ddlm_jax.data.tokenizers import EOS_ID
from ddlm_jax.data.tokenizers import load_tokenizer
from ddlm_jax.data.tokenizers import MASK_ID
from ddlm_jax.data.tokenizers import PAD_ID
from ddlm_jax.data.tokenizers import SentencePieceTokenizer
from ddlm_jax.data.tokenizers import SPECIAL_TOKENS
from ddlm_jax.data.tokenizers import Tokenizer

__all__ = [
    "BOS_ID", "BatchIterator", "CharTokenizer", "DataBundle", "DataConfig", "Document", "EOS_ID",
    "LocalText", "MASK_ID", "PAD_ID", "RestaurantCorpus", "SPECIAL_TOKENS",
    "SentencePieceTokenizer", "Tokenizer", "WindowIterator", "build_tokenizer", "count_truncated",
    "cut_rows", "default_corpus", "encode_stream", "load_catalog_texts", "load_data", "load_local_texts",
    "load_tokenizer", "pack_documents", "pack_stream", "pad_documents", "split_seed", "train_batches",
]
