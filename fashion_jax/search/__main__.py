"""Visual search from a trained workdir, without writing code.

  python -m fashion_jax.search index  --workdir runs/demo --index runs/demo_index --catalogue shop.csv
  python -m fashion_jax.search query  --index runs/demo_index street.jpg [--category dress] [-k 10]
  python -m fashion_jax.search serve  --index runs/demo_index [--port 8080]
  python -m fashion_jax.search export --workdir runs/demo --out runs/demo_export
  python -m fashion_jax.search evaluate --index runs/demo_index labelled_photos.csv
  python -m fashion_jax.search verify --index runs/demo_index

Bad input ends the command with one line on stderr and exit status 2; `verify` ends with
exit status 1 when it finds the index damaged.
"""

import argparse
import errno
import functools
import json
import os
import sys

import fashion_jax.search
from fashion_jax import console

fashion_jax.search.use_every_cpu_core()  # before JAX starts

from fashion_jax.search import backends  # noqa: E402
from fashion_jax.search import catalogue as search_catalogue  # noqa: E402
from fashion_jax.search import images as image_io  # noqa: E402
from fashion_jax.search.images import InputError  # noqa: E402
from fashion_jax.checkpointing import CheckpointDamaged  # noqa: E402


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog='python -m fashion_jax.search', description=__doc__,
                   formatter_class=_HelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  commands.add_parser = functools.partial(commands.add_parser, formatter_class=_HelpFormatter)

  index = commands.add_parser('index', help='embed a catalogue into an index (or add to one)')
  index.add_argument('--workdir', required=True, help='training workdir (config.json, checkpoints/)')
  index.add_argument('--step', type=int, help='checkpoint step (default: the latest)')
  index.add_argument('--index', required=True, help='index directory, created or extended')
  _catalogue_flags(index)
  index.add_argument('--dtype', choices=('float16', 'float32'),
                     help='of the stored embeddings, for a new index (default: float16)')
  index.add_argument('--centroids', action='store_true', help='also store one vector per product')
  index.add_argument('--max-pixels', type=int, default=image_io.DEFAULT_MAX_PIXELS,
                     help='largest image accepted, in pixels')
  index.add_argument('--backend', choices=backends.backend_names(),
                     help='search backend, chosen when the index is created (default: exact)')
  index.add_argument('--faiss-factory', help='FAISS index_factory string (default: from size)')
  index.add_argument('--nprobe', type=int, help='FAISS IVF lists searched per query')
  index.add_argument('--ef-search', type=int, help='FAISS HNSW search breadth')
  index.add_argument('--faiss-refine', type=float,
                     help='FAISS candidates re-scored per result (a factory with Refine)')
  index.add_argument('--qdrant-url', help='Qdrant server or cluster, e.g. http://host:6333')
  index.add_argument('--qdrant-path', help="Qdrant's embedded local mode: a folder")
  index.add_argument('--collection', help='Qdrant collection (default: from the index folder)')
  index.add_argument('--qdrant-shards', type=int, help='Qdrant shards of the collection')
  index.add_argument('--qdrant-replicas', type=int, help='Qdrant copies of each shard')

  update = commands.add_parser('update', help="replace the images of a catalogue's products")
  update.add_argument('--index', required=True, help='index directory')
  _catalogue_flags(update)
  _model_flags(update)

  remove = commands.add_parser('remove', help='take products out of the index')
  remove.add_argument('--index', required=True, help='index directory')
  remove.add_argument('--products', nargs='+', default=[], metavar='ID', help='product ids')
  remove.add_argument('--products-file', help='a text file of product ids, one per line')

  query = commands.add_parser('query', help='search the index with street photos')
  query.add_argument('--index', required=True, help='index directory')
  query.add_argument('inputs', nargs='+', help='image files, folders of images, or CSV files '
                     '(image[,x,y,w,h][,category])')
  query.add_argument('--box', help='x,y,w,h crop of a single image query')
  query.add_argument('--category', help='only products of this category')
  query.add_argument('-k', type=int, default=10, help='products per query')
  query.add_argument('--out', default='search_results', help='folder for results.json and PNGs')
  query.add_argument('--no-centroids', action='store_true',
                     help='rank by the best image even when the index has centroids')
  _model_flags(query)

  serve = commands.add_parser('serve', help='HTTP service and web page over the index')
  serve.add_argument('--index', required=True, help='index directory')
  serve.add_argument('--host', default='127.0.0.1', help='address to listen on (loopback)')
  serve.add_argument('--port', type=int, default=8080, help='port to listen on')
  serve.add_argument('--max-upload-bytes', type=int, default=10 * 1024 * 1024,
                     help='largest photo accepted in a request')
  serve.add_argument('-k', type=int, default=12, help='default products per query')
  serve.add_argument('--max-in-flight', type=int, default=64,
                     help='searches admitted at once; more are answered 503')
  serve.add_argument('--max-batch', type=int, default=16,
                     help='queries embedded together (1: no batching)')
  serve.add_argument('--max-wait-ms', type=float, default=5.0,
                     help='how long a query waits for others to batch with')
  serve.add_argument('--quiet', action='store_true', help='no access log')
  _model_flags(serve)

  evaluate = commands.add_parser('evaluate', help='how often the index finds the right product '
                                 'for labelled photos (Acc@n, MRR)')
  evaluate.add_argument('--index', required=True, help='index directory')
  evaluate.add_argument('queries', help='CSV with a header: image,product_id[,category]'
                        '[,x,y,w,h] (paths relative to the CSV)')
  evaluate.add_argument('-k', type=int, default=50, help='products returned per photo')
  evaluate.add_argument('--filter-by-category', action='store_true',
                        help="search each photo within its row's category (as a shop page with "
                        'a category picker does); otherwise the category only groups figures')
  evaluate.add_argument('--no-centroids', action='store_true',
                        help='rank by the best image even when the index has centroids')
  evaluate.add_argument('--out', help='write evaluation.json (figures and every rank) here')
  evaluate.add_argument('--quiet', action='store_true', help='no progress bar')
  _model_flags(evaluate)

  verify = commands.add_parser('verify', help="read a whole index and check it against its "
                               'record (sizes, sha256, vectors, backend, thumbnails)')
  verify.add_argument('--index', required=True, help='index directory')
  verify.add_argument('--quiet', action='store_true', help='only the problems, no progress')

  export = commands.add_parser('export', help='StableHLO and TF SavedModel of the embedding')
  export.add_argument('--workdir', required=True, help='training workdir (config.json, '
                      'checkpoints/)')
  export.add_argument('--step', type=int, help='checkpoint step (default: the latest)')
  export.add_argument('--out', required=True, help='output folder')
  export.add_argument('--no-saved-model', action='store_true', help='StableHLO only (no TF)')
  return parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Each option's default after its help, where it has one worth showing."""

  def _get_help_string(self, action):
    text = action.help or ''
    if (action.option_strings and '(default' not in text
        and action.default not in (None, False, argparse.SUPPRESS)):
      text += ' (default: %(default)s)'
    return text


class _Parser(argparse.ArgumentParser):
  """Usage mistakes are one line on stderr and exit status 2, like every other bad input."""

  def error(self, message):
    self.exit(2, f'error: {" ".join(message.split())} (see {self.prog} --help)\n')


def _check_numbers(args) -> None:
  """The numbers' ranges, before any file is read (argparse only checks they are numbers)."""
  for flag in ('k', 'max_pixels', 'batch_size', 'nprobe', 'ef_search', 'max_upload_bytes',
               'max_in_flight', 'max_batch', 'qdrant_shards', 'qdrant_replicas', 'faiss_refine'):
    value = getattr(args, flag, None)
    if value is not None and not value >= 1:  # also NaN
      raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
  if args.command == 'serve' and not 0 <= args.port <= 65535:
    raise InputError(f'--port must be from 0 to 65535, got {args.port}')
  if args.command == 'serve' and not 0 <= args.max_wait_ms <= 1000:
    raise InputError(f'--max-wait-ms must be from 0 to 1000, got {args.max_wait_ms}')


def _catalogue_flags(parser):
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--catalogue', help='CSV with a header (image,product_id[,category]'
                      '[,x,y,w,h]), JSON or JSON lines (docs/search.md)')
  source.add_argument('--tfds', help='TFDS dataset name, e.g. fashion_synth/demo')
  parser.add_argument('--images-root', help='folder that relative image paths start from '
                      '(default: the catalogue file\'s folder)')
  parser.add_argument('--split', default='gallery', help='TFDS split (with --tfds)')
  parser.add_argument('--domain', default='', help='only images of this TFDS domain, e.g. shop')
  parser.add_argument('--data-dir', help='TFDS data_dir')
  parser.add_argument('--batch-size', type=int, default=64, help='images embedded at once')


def _model_flags(parser):
  parser.add_argument('--workdir', help='use this workdir\'s latest checkpoint (default: the one '
                      'recorded in the index); it must be the model that built the index')
  parser.add_argument('--max-pixels', type=int, default=image_io.DEFAULT_MAX_PIXELS,
                      help='largest image accepted, in pixels')


def _index_and_model(args, index=None):
  from fashion_jax.search import index as search_index
  from fashion_jax.search.model import SearchModel
  index = index or search_index.SearchIndex(args.index)
  if args.workdir:
    model = SearchModel(args.workdir)
  else:
    recorded = index.meta['model']
    model = SearchModel(recorded['workdir'], step=recorded['step'])
  search_index.check_model(index.meta, model)
  return index, model


def _query_inputs(args) -> list[dict]:
  """Every query photo as {'name', 'path', 'box', 'category'}."""
  queries = []
  for path in args.inputs:
    if os.path.isdir(path):
      files = search_catalogue.image_files(path)
      if not files:
        raise InputError(f'{path}: no image files in this folder')
      queries += [{'path': f, 'box': None, 'category': None} for f in files]
    elif path.lower().endswith('.csv'):
      root = os.path.dirname(os.path.abspath(path))
      rows = search_catalogue.read_csv(path, ('image',), optional=('category',))
      for number, row in enumerate(rows, start=2):
        if not row['image']:
          raise InputError(f'{path}: row {number} has no image')
        box = search_catalogue.row_box(row, path, number)
        queries.append({'path': os.path.join(root, row['image']), 'box': image_io.parse_box(box),
                        'category': row.get('category') or None})
    else:
      queries.append({'path': path, 'box': None, 'category': None})
  if args.box:
    if len(queries) != 1:
      raise InputError('--box needs exactly one query image (use a CSV for several boxes)')
    queries[0]['box'] = image_io.parse_box(args.box)
  return queries


def _catalogue(args):
  if args.catalogue:
    return search_catalogue.read_catalogue(args.catalogue, args.images_root)
  return search_catalogue.read_tfds_catalogue(args.tfds, args.split, args.data_dir, args.domain)


def run_index(args) -> int:
  from fashion_jax.search import index as search_index
  from fashion_jax.search.model import SearchModel
  entries = _catalogue(args)
  settings = {key: value for key, value in (
      ('factory', args.faiss_factory), ('nprobe', args.nprobe), ('ef_search', args.ef_search),
      ('refine', args.faiss_refine),
      ('url', args.qdrant_url), ('path', args.qdrant_path), ('collection', args.collection),
      ('shards', args.qdrant_shards), ('replicas', args.qdrant_replicas))
      if value is not None}
  model = SearchModel(args.workdir, step=args.step, batch_size=args.batch_size)
  result = search_index.build(args.index, model, entries, dtype=args.dtype,
                              centroids=args.centroids or None, max_pixels=args.max_pixels,
                              backend=args.backend, backend_settings=settings)
  print(f"{args.index}: added {result['added']} images, skipped {result['skipped']} already "
        f"indexed, {result['count']} in all")
  return 0


def run_update(args) -> int:
  from fashion_jax.search import index as search_index
  entries = _catalogue(args)
  index, model = _index_and_model(args)
  model.batch_size = args.batch_size
  result = search_index.build(index.directory, model, entries, max_pixels=args.max_pixels,
                              replace=True)
  products = len({entry['product_id'] for entry in entries})
  print(f"{args.index}: {products} products updated: {result['replaced']} old images out, "
        f"{result['added']} new in; {result['count']} images in all")
  return 0


def run_remove(args) -> int:
  from fashion_jax.search import index as search_index
  ids = list(args.products)
  if args.products_file:
    text = image_io.read_text(args.products_file, search_catalogue.MAX_CATALOGUE_BYTES)
    ids += [line.strip() for line in text.splitlines() if line.strip()]
  if not ids:
    raise InputError('name the products to remove with --products or --products-file')
  result = search_index.remove_products(args.index, ids)
  print(f"{args.index}: removed {result['products']} products ({result['removed']} images); "
        f"{result['count']} images left")
  return 0


def run_query(args) -> int:
  from fashion_jax.search import engine
  from fashion_jax.search import index as search_index
  queries = _query_inputs(args)
  index = search_index.SearchIndex(args.index)
  # Every photo, box and category is checked before the model is loaded or anything written.
  crops, categories = [], []
  for query in queries:
    image = image_io.read(query['path'], max_pixels=args.max_pixels)
    crops.append(image_io.crop(image, query['box'], name=query['path']))
    category = args.category or query['category']
    if category and category not in index.categories:
      known = ', '.join(index.categories[:20]) or 'none'
      raise InputError(f'unknown category {category!r} (this index has: {known})')
    categories.append(category)
  index, model = _index_and_model(args, index)
  searcher = engine.Searcher(index, model, use_centroids=False if args.no_centroids else None,
                             max_pixels=args.max_pixels)
  embeddings = model.embed_crops(crops)
  results = []
  for position, query in enumerate(queries):
    found = searcher.search_embeddings(embeddings[position:position + 1], k=args.k,
                                       category=categories[position])[0]
    results.append({'query': query['path'], 'box': list(query['box']) if query['box'] else None,
                    'category': categories[position], 'results': found})
  os.makedirs(args.out, exist_ok=True)
  for position, result in enumerate(results):
    name = os.path.splitext(os.path.basename(result['query']))[0]
    picture = f'{position:04d}_{name}.png'
    engine.result_picture(crops[position], result['results'], index).save(
        os.path.join(args.out, picture))
    result['picture'] = picture
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({'index': index.directory, 'k': args.k, 'queries': results}, f, indent=2)
  for result in results:
    print(f"{result['query']}" + (f"  box {result['box']}" if result['box'] else '') +
          (f"  category {result['category']}" if result['category'] else ''))
    print(f"  {'rank':>4}  {'product':<20} {'category':<16} {'score':>7}")
    for rank, found in enumerate(result['results'], start=1):
      print(f"  {rank:>4}  {found['product_id']:<20} {found['category']:<16} "
            f"{found['score']:>7.4f}")
  print(f'wrote {os.path.join(args.out, "results.json")} and {len(results)} PNG(s)')
  return 0


def run_serve(args) -> int:
  from fashion_jax.search import engine, server
  index, model = _index_and_model(args)
  searcher = engine.Searcher(index, model, max_pixels=args.max_pixels)
  try:
    httpd = server.make_server(searcher, host=args.host, port=args.port, quiet=args.quiet,
                               max_upload_bytes=args.max_upload_bytes, default_k=args.k,
                               max_in_flight=args.max_in_flight, max_batch=args.max_batch,
                               max_wait_ms=args.max_wait_ms)
  except OSError as e:  # the port is taken, the host unknown
    raise InputError(f'cannot serve on {args.host}:{args.port}: '
                     f'{e.strerror or type(e).__name__}') from None
  host, port = httpd.server_address[:2]
  searcher.follow()
  index = searcher.index  # live rows: removed products are not served
  print(f'serving {index.directory} ({index.num_live} images, '
        f'{int(index.product_live.sum())} products) '
        f'on http://{host}:{port}/; changes to the index are taken up as they are made',
        flush=True)
  try:
    httpd.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    httpd.server_close()
  return 0


def run_evaluate(args) -> int:
  from fashion_jax.search import engine, evaluation
  from fashion_jax.search import index as search_index
  root = os.path.dirname(os.path.abspath(args.queries))
  rows = search_catalogue.read_csv(args.queries, ('image', 'product_id'), optional=('category',))
  index = search_index.SearchIndex(args.index)
  queries = []
  # Every row is checked before the model is loaded: paths, boxes, categories.
  for number, row in enumerate(rows, start=2):
    if not row['image'] or not row['product_id']:
      raise InputError(f'{args.queries}: row {number} has no image or no product_id')
    category = row.get('category') or None
    if args.filter_by_category and category and category not in index.categories:
      raise InputError(f'{args.queries}: row {number}: unknown category {category!r} (this '
                       f"index has: {', '.join(index.categories[:20]) or 'none'})")
    path = os.path.join(root, row['image'])
    if not os.path.isfile(path):
      raise InputError(f'{args.queries}: row {number}: {path} is not a file')
    queries.append({'path': path, 'product_id': row['product_id'], 'category': category,
                    'row': number,
                    'box': image_io.parse_box(search_catalogue.row_box(row, args.queries,
                                                                       number))})
  if not queries:
    raise InputError(f'{args.queries}: no rows')
  index, model = _index_and_model(args, index)
  searcher = engine.Searcher(index, model, use_centroids=False if args.no_centroids else None,
                             max_pixels=args.max_pixels)
  result = evaluation.evaluate(searcher, queries, k=args.k,
                               filter_by_category=args.filter_by_category,
                               progress=not args.quiet)
  for line in evaluation.summary(result):
    print(line)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, 'evaluation.json')
    with open(path, 'w') as f:
      json.dump({'index': index.directory, 'queries_file': os.path.abspath(args.queries),
                 'centroids': searcher.use_centroids, **result}, f, indent=2)
    print(f'wrote {path}')
  return 0


def run_verify(args) -> int:
  from fashion_jax.search import verify
  report = verify.verify(args.index, progress=not args.quiet)
  if not args.quiet:
    for line in report.checked:
      print(f'checked: {line}')
  for line in report.notes:
    print(f'note: {image_io.one_line(line)}')
  for line in report.problems:
    print(f'problem: {image_io.one_line(line)}', file=sys.stderr)
  if report.problems:
    print(f'{args.index}: {len(report.problems)} problem(s): damaged index', file=sys.stderr)
    return 1
  print(f'{args.index}: verified, no problems')
  return 0


def run_export(args) -> int:
  from fashion_jax.search import export
  from fashion_jax.search.model import SearchModel
  model = SearchModel(args.workdir, step=args.step)
  written = export.export_all(model, args.out, saved_model=not args.no_saved_model)
  for path in written:
    print(f'wrote {path}')
  return 0


# A disk's refusals that a file object reports without the file's name (f.write).
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)


def _dataset_errors() -> tuple[type[Exception], ...]:
  """A TFDS catalogue's errors, where one was read: data_pipelines imports TensorFlow, which
  the other commands neither need nor import."""
  datasets = sys.modules.get('data_pipelines.datasets')
  return (datasets.DatasetMissingError,) if datasets else ()


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  # TensorFlow (and its start-up notices) only for a SavedModel or a TFDS catalogue.
  console.quiet_start(tensorflow=(args.command == 'export' and not args.no_saved_model)
                      or bool(getattr(args, 'tfds', None)))
  console.set_verbosity(requested=False)
  command = {'index': run_index, 'update': run_update, 'remove': run_remove,
             'query': run_query, 'serve': run_serve, 'export': run_export,
             'evaluate': run_evaluate, 'verify': run_verify}[args.command]
  try:
    _check_numbers(args)
    return command(args)
  except (InputError, CheckpointDamaged, ValueError, *_dataset_errors()) as e:
    # One line even when a file or product name brings a line break of its own.
    print(f'error: {image_io.one_line(e)}', file=sys.stderr)
    return 2
  except OSError as e:  # an output path that is a file, or cannot be written; a full disk
    if e.filename is None and e.errno not in _DISK_ERRORS:
      raise
    line = console.path_error(e) if e.filename else f'writing failed: {e.strerror}'
    print(f"error: {' '.join(line.split())}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback
    changes = args.command in ('index', 'update', 'remove')
    embeds = args.command in ('index', 'update')
    print('interrupted' + ('; the index is as it was, or as this change made it if it had '
                           'committed (a change is whole or not at all)' if changes else '') +
          ('; run the same command again to embed only the images not embedded yet' if embeds
           else ''), file=sys.stderr, flush=True)
    if _PROCESS['exit_at_once']:
      # XLA's threads may be mid-compilation: tearing the interpreter down under them can
      # crash it. Nothing is left to write (a change commits whole or not at all).
      sys.stdout.flush()
      os._exit(130)
    return 130


_PROCESS = {'exit_at_once': False}  # run as the program, not called from Python


if __name__ == '__main__':
  _PROCESS['exit_at_once'] = True
  sys.exit(main())
