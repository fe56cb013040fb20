"""Converts SBD class masks (`dataset/cls/*.mat`) to VOC palette PNGs for `voc_aug`.

    python bin/convert_sbd.py --sbd_dir=benchmark_RELEASE/dataset \
        --voc_dir=VOCdevkit/VOC2012 --write_list

writes VOC2012/SegmentationClassAug/<id>.png and, with --write_list,
VOC2012/ImageSets/SegmentationAug/train_aug.txt ((SBD train+val + VOC train) - VOC val).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from mm_tf.data import sbd  # noqa: E402
from mm_tf.data.errors import DatasetError  # noqa: E402

flags.DEFINE_string("sbd_dir", None, "SBD `dataset` folder (holds cls/, train.txt, val.txt).")
flags.DEFINE_string("voc_dir", None, "VOC2012 folder; PNGs go to its SegmentationClassAug/.")
flags.DEFINE_bool("write_list", False, "Also write ImageSets/SegmentationAug/train_aug.txt.")
flags.DEFINE_bool("overwrite", False, "Rewrite PNGs that already exist.")
flags.mark_flags_as_required(["sbd_dir", "voc_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    sbd_dir, voc_dir = pathlib.Path(f.sbd_dir), pathlib.Path(f.voc_dir)
    try:
        written = sbd.convert_sbd(sbd_dir / "cls", voc_dir / "SegmentationClassAug",
                                  overwrite=f.overwrite)
        print(f"wrote {written} PNGs to {voc_dir / 'SegmentationClassAug'}")
        if f.write_list:
            print(f"wrote {sbd.write_train_aug_list(sbd_dir, voc_dir)}")
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
