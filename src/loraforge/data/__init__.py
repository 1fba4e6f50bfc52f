"""Training data: read records from files, tokenize them with loss masks, pack, collate and batch.

    records = read_records("train.jsonl")                    # records.py (file syntax in files.py)
    train, val = split_records(records, val_split=0.1)
    examples = encode_records(train, tokenizer, max_len=1024)  # encode.py
    rows = pack_examples(examples, max_len=1024)              # pack.py, optional
    batcher = Batcher(rows, batch_size=8, seed=0)             # sampler.py
    batch = collate(batcher.next_batch(), tokenizer.pad_token_id)
    loss = model(batch["input_ids"], positions=batch["positions"],
                 attention_mask=batch["attention_mask"], labels=batch["labels"])
"""

from .encode import IGNORE_INDEX, Example, encode_record, encode_records
from .pack import collate, pack_examples
from .records import FORMATS, Record, prompt_and_reference, read_records, split_records
from .sampler import Batcher, batches

__all__ = ["FORMATS", "IGNORE_INDEX", "Batcher", "Example", "Record", "batches", "collate", "encode_record",
           "encode_records", "pack_examples", "prompt_and_reference", "read_records", "split_records"]
