"""The web page end to end in headless Chromium (Debian's chromium + chromedriver, via Selenium):
upload a photo, drag a box, pick a category, see the products the JSON API gives for that box."""

import json
import os
import shutil
import tempfile
import urllib.parse
import urllib.request

import pytest

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'


@pytest.fixture(scope='module')
def browser():
  missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
  if missing:
    pytest.skip(f'headless browser test needs Debian chromium and chromium-driver '
                f'({", ".join(missing)} missing; apt-get install chromium chromium-driver)')
  webdriver = pytest.importorskip('selenium.webdriver', reason='needs the selenium package '
                                  '(pip install -e ".[test]")')
  profile = tempfile.mkdtemp(prefix='chromium-profile-')
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ('--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
               '--disable-background-networking', '--disable-component-update', '--disable-sync',
               '--disable-dev-shm-usage', f'--user-data-dir={profile}', '--window-size=1200,900'):
    options.add_argument(flag)
  service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
  driver = webdriver.Chrome(options=options, service=service)
  try:
    yield driver
  finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _api(url, path, box=None, category=None, k=4):
  params = {'k': k, **({'box': box} if box else {}), **({'category': category} if category else {})}
  with open(path, 'rb') as f:
    request = urllib.request.Request(f'{url}/api/search?{urllib.parse.urlencode(params)}',
                                     data=f.read(), method='POST')
  with urllib.request.urlopen(request, timeout=60) as response:
    return json.load(response)


def test_upload_box_category_and_results(browser, service, catalogue):
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support import expected_conditions as ec
  from selenium.webdriver.support.ui import Select, WebDriverWait
  wait = WebDriverWait(browser, 60)
  browser.get(service['url'] + '/')
  wait.until(lambda d: 'products' in d.find_element(By.ID, 'info').text)
  photo = os.path.join(catalogue['dir'], 'p5_1.jpg')  # 96 x 48, the garment at x 16..80
  browser.find_element(By.ID, 'file').send_keys(photo)
  wait.until(ec.element_to_be_clickable((By.ID, 'search')))
  canvas = browser.find_element(By.ID, 'canvas')
  # The page shows the photo enlarged by `scale` (up to 4x, at most 480 px wide).
  scale = canvas.size['width'] / 96
  assert scale == 4 and canvas.size['height'] == 48 * scale
  # Drag from image pixel (20, 4) to (76, 44); offsets count from the canvas's centre.
  ActionChains(browser).move_to_element_with_offset(
      canvas, round((20 - 48) * scale), round((4 - 24) * scale)).click_and_hold() \
      .move_by_offset(round(28 * scale), round(20 * scale)) \
      .move_by_offset(round(28 * scale), round(20 * scale)).release().perform()
  box = browser.find_element(By.ID, 'box').text
  x, y, w, h = (int(v) for v in box.split(','))
  assert abs(x - 20) <= 1 and abs(y - 4) <= 1 and abs(w - 56) <= 1 and abs(h - 40) <= 1, box
  Select(browser.find_element(By.ID, 'category')).select_by_value('shoe')
  k = browser.find_element(By.ID, 'k')
  k.clear()
  k.send_keys('3')
  browser.find_element(By.ID, 'search').click()
  wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#results .result')) > 0)
  cells = browser.find_elements(By.CSS_SELECTOR, '#results .result')
  shown = [cell.get_attribute('data-product') for cell in cells]
  expected = _api(service['url'], photo, box=box, category='shoe', k=3)['results']
  assert shown == [r['product_id'] for r in expected] and len(shown) == 3
  assert shown[0] == 'sku-5'
  # Every result picture loaded (the server sent the index's thumbnails).
  for image in browser.find_elements(By.CSS_SELECTOR, '#results .result img'):
    assert browser.execute_script('return arguments[0].complete && arguments[0].naturalWidth',
                                  image) > 0
  assert browser.find_element(By.ID, 'error').text == ''


def test_page_shows_the_services_error(browser, service, tmp_path):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  browser.get(service['url'] + '/')
  bad = tmp_path / 'not_a_photo.jpg'
  bad.write_bytes(b'just some text')
  browser.find_element(By.ID, 'file').send_keys(str(bad))
  WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, 'search').is_enabled())
  browser.find_element(By.ID, 'search').click()
  WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, 'error').text)
  assert 'not an image' in browser.find_element(By.ID, 'error').text
  assert browser.find_elements(By.CSS_SELECTOR, '#results .result') == []
