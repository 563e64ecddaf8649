"""Convert the released LaVIT checkpoint into a folder that the lavit_pipelines pipelines load.

python conversion/convert_lavit_to_diffusers.py --checkpoint_path rain1011/LaVIT-7B-v2 --dump_path lavit-7b-v2
"""

import argparse
import sys

from lavit_pipelines.conversion import DTYPES, PIXEL_DECODERS, convert


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_path", required=True, help="release folder or Hub repo id")
    parser.add_argument("--dump_path", required=True, help="output folder")
    parser.add_argument("--pixel_decoder", choices=sorted(PIXEL_DECODERS), default="highres")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: keep the source dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty dump_path")
    parser.add_argument("--safety_checker", action="store_true", help="include the release's SD safety checker")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = convert(
            args.checkpoint_path, args.dump_path, args.pixel_decoder, args.dtype, args.overwrite, args.safety_checker
        )
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(f"converted {args.checkpoint_path} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
