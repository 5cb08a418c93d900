"""Evaluation embedding spread over all ranks.

Under ZeRO-3 every forward pass is a collective (each layer all-gathers its parameter shards), so
during training *every* rank must run the same number of forwards at evaluation time, or the job
hangs. :class:`ShardedEncoder` gives each rank an equal share of the sentences (the last share is
padded with repeats), has each embed its share in the same number of batches, and all-gathers
the result, so W ranks embed W times faster and no rank waits on a collective the others skip.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class ShardedEncoder:
    """``encode`` with the signature of :meth:`pcc_dist.modeling.Embedder.encode`, over W ranks.

    Args:
        embedder: The (possibly ZeRO-3 partitioned) embedder; its ``encode`` does the work.
        rank: This process's rank.
        world_size: W.
    """

    def __init__(self, embedder, rank: int, world_size: int):
        self.embedder = embedder
        self.rank = rank
        self.world_size = world_size

    def encode(self, sentences: list[str], batch_size: int = 64, show_progress: bool = False,
               max_length: int | None = None) -> torch.Tensor:
        """Embed ``sentences``; every rank gets the full result.

        Shape:
            Output: ``[n, D]`` float32 on CPU, row i = sentences[i].
        """
        if self.world_size == 1:
            return self.embedder.encode(sentences, batch_size=batch_size,
                                        show_progress=show_progress, max_length=max_length)
        n = len(sentences)
        share = -(-n // self.world_size)  # ceil: equal shares, so equal batch counts per rank
        # Rank r takes sentences r, r + W, r + 2W, ...: strided shares have similar length
        # mixes, so no rank waits long on another with all the long sentences.
        mine = sentences[self.rank::self.world_size]
        mine = mine + [sentences[0]] * (share - len(mine))
        local = self.embedder.encode(mine, batch_size=batch_size,
                                     show_progress=show_progress and self.rank == 0,
                                     max_length=max_length).float()
        if dist.get_backend() == "nccl":  # nccl moves CUDA tensors only
            local = local.to(torch.device("cuda", torch.cuda.current_device()))
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local.contiguous())
        # Undo the striding: row j of rank r's share is sentence r + j * W.
        out = torch.stack(gathered, dim=1).reshape(share * self.world_size, -1)
        return out[:n].cpu()
