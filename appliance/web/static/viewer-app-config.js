/* OHIF 3.13 configuration written by the appliance; served as /viewer/app-config.js
 * (and inlined into the viewer's page) by appliance/web/viewer.py. */
(function () {
  'use strict';

  // -- CT head (stroke) hanging protocol -------------------------------------------------
  // OHIF's viewer mode always asks for the protocol named 'default'. We register a
  // generator under that name (our extension registers after OHIF's own, so it wins):
  // it looks at the study being opened and returns either our CT head protocol or,
  // for every other study, OHIF's own default protocol unchanged.
  var BRAIN_WINDOW = { windowWidth: 80, windowCenter: 40 };
  var HEAD_BODY_PARTS = ['HEAD', 'BRAIN', 'SKULL', 'HEADNECK'];
  // "CTA" alone is not enough: CTA chest / aorta / runoff are not head studies.
  var HEAD_WORDS = /\b(head|brain|stroke|neuro|skull|cranial|intracranial|cerebral)\b/i;
  var OTHER_KERNELS = /\b(bone|lung|mip|minip|sag|sagittal|cor|coronal|3d|vr)\b/i;
  var MIN_STACK_IMAGES = 10; // fewer is a localizer, a dose sheet or a key image

  function first(value) {
    return Array.isArray(value) ? value[0] : value;
  }

  function text(value) {
    return value === undefined || value === null ? '' : String(first(value));
  }

  function isHeadCt(ds) {
    var inst = ds.instance || {};
    if (ds.Modality !== 'CT') {
      return false;
    }
    var part = text(inst.BodyPartExamined).toUpperCase().replace(/[^A-Z]/g, '');
    return HEAD_BODY_PARTS.indexOf(part) >= 0 ||
      HEAD_WORDS.test(text(inst.StudyDescription)) ||
      HEAD_WORDS.test(text(ds.SeriesDescription || inst.SeriesDescription));
  }

  function isLocalizer(ds) {
    var types = (ds.instance && ds.instance.ImageType) || [];
    types = Array.isArray(types) ? types : String(types).split('\\');
    return types.some(function (t) { return String(t).toUpperCase() === 'LOCALIZER'; }) ||
      (ds.numImageFrames || 0) < MIN_STACK_IMAGES;
  }

  function isAxial(ds) {
    var iop = (ds.instance && ds.instance.ImageOrientationPatient) || [];
    if (iop.length !== 6) {
      return false;
    }
    var nz = iop[0] * iop[4] - iop[1] * iop[3]; // z of row x column: the slice normal
    return Math.abs(nz) > 0.9;
  }

  /** The series a stroke reader starts on: axial, soft tissue, most images, thinnest. */
  function headStack(displaySets, studyUid) {
    var study = displaySets.filter(function (ds) {
      return !studyUid || ds.StudyInstanceUID === studyUid;
    });
    if (!study.some(isHeadCt)) {
      return null;
    }
    var stacks = study.filter(function (ds) {
      return ds.Modality === 'CT' && !isLocalizer(ds);
    });
    function rank(ds) {
      var thickness = parseFloat(text(ds.instance && ds.instance.SliceThickness)) || 99;
      return [isAxial(ds) ? 0 : 1,
              OTHER_KERNELS.test(text(ds.SeriesDescription)) ? 1 : 0,
              -(ds.numImageFrames || 0),
              thickness];
    }
    stacks.sort(function (a, b) {
      var ra = rank(a), rb = rank(b);
      for (var i = 0; i < ra.length; i++) {
        if (ra[i] !== rb[i]) {
          return ra[i] - rb[i];
        }
      }
      return 0;
    });
    return stacks[0] || null;
  }

  function clone(obj) {
    return JSON.parse(JSON.stringify(obj));
  }

  function headProtocol(stack, fallback) {
    var viewport = clone(fallback.stages[0].viewports[0]);
    viewport.viewportOptions.viewportType = 'stack';
    // Start in the middle of the stack: at the basal ganglia and insula, where early
    // MCA-territory signs are judged, and the reader scrolls up or down from there.
    viewport.viewportOptions.initialImageOptions = { preset: 'middle' };
    viewport.displaySets = [{ id: 'ctHeadAxial', options: { voi: clone(BRAIN_WINDOW) } }];
    var selectors = clone(fallback.displaySetSelectors || {});
    selectors.ctHeadAxial = {
      seriesMatchingRules: [{
        attribute: 'displaySetInstanceUID',
        constraint: { equals: { value: stack.displaySetInstanceUID } },
        required: true,
      }],
    };
    return Object.assign(clone(fallback), {
      id: 'default', // what the mode asks for; getState() and layout changes keep working
      name: 'CT head (stroke)',
      description: 'Axial soft-tissue stack, brain window W80/L40, middle slice',
      applianceProtocol: 'ct-head-stroke',
      displaySetSelectors: selectors,
      stages: [{
        id: 'ctHeadStroke',
        name: 'CT head (stroke)',
        viewportStructure: { layoutType: 'grid', properties: { rows: 1, columns: 1 } },
        viewports: [viewport],
      }],
    });
  }

  var applianceExtension = {
    id: '@appliance/extension-hanging-protocols',
    getHangingProtocolModule: function (ctx) {
      var hp = ctx.servicesManager.services.hangingProtocolService;
      var ohifDefault;
      try {
        ohifDefault = clone(hp.getProtocolById('default'));
      } catch (e) {
        console.warn('appliance: no default hanging protocol to extend', e);
        return [];
      }
      function strokeHeadOrDefault() {
        var stack = headStack(hp.displaySets || [],
                              hp.activeStudy && hp.activeStudy.StudyInstanceUID);
        return { protocol: stack ? headProtocol(stack, ohifDefault) : clone(ohifDefault) };
      }
      return [{ name: 'default', protocol: strokeHeadOrDefault }];
    },
  };

  // -- Progressive loading over thin links (HTJ2K RPCL, byte ranges) ---------------------
  // The hanging protocol's image loads whole, at full quality, as OHIF asks for it. Then a
  // loader of our own walks the whole stack in cornerstone3D retrieve stages: every 4th
  // slice, then the rest, each from the first PREVIEW_BYTES of its lossless HTJ2K RPCL
  // codestream (a byte range: a whole image at reduced resolution, quality status
  // SUBRESOLUTION), then the rest of every codestream (FULL_RESOLUTION). cornerstone's
  // loader always sends "transfer-syntax=*"; the accept query parameter asks our
  // DICOMweb for HTJ2K instead (it wins over the header). Slices the reader scrolls to
  // are the viewport's own Interaction requests, served before these (Thumbnail: a
  // type OHIF does not clear when the stack changes, unlike Prefetch).
  var HTJ2K_ACCEPT = 'accept=' + encodeURIComponent(
    'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.4.202');
  var PREVIEW_BYTES = 16384; // ~1/12 of a 512x512 CT frame's codestream
  var STACK_STAGES = [
    { id: 'previewQuarter', decimate: 4, offset: 0, retrieveType: 'preview',
      requestType: 'thumbnail', priority: 6 },
    { id: 'previewRest1', decimate: 4, offset: 2, retrieveType: 'preview',
      requestType: 'thumbnail', priority: 7 },
    { id: 'previewRest2', decimate: 2, offset: 1, retrieveType: 'preview',
      requestType: 'thumbnail', priority: 7 },
    { id: 'fullQuality', retrieveType: 'full', requestType: 'thumbnail', priority: 8 },
  ];
  var STACK_RETRIEVE_OPTIONS = {
    preview: { rangeIndex: 0, chunkSize: PREVIEW_BYTES, decodeLevel: 2,
               urlArguments: HTJ2K_ACCEPT },
    full: { rangeIndex: -1, chunkSize: PREVIEW_BYTES, urlArguments: HTJ2K_ACCEPT },
  };
  var progress = { started: {}, loads: [] };
  window.applianceProgressive = progress; // what tests and the benchmark read

  function startStackLoader(viewport, cs) {
    var ids = viewport.getImageIds ? viewport.getImageIds() : [];
    var key = ids[0];
    if (!key || ids.length < 2 || progress.started[key]) {
      return;
    }
    progress.started[key] = true;
    var load = { total: ids.length, preview: {}, full: {}, errors: 0, startedAt: Date.now() };
    progress.loads.push(load);
    var listener = {
      getLoaderImageOptions: function (imageId) {
        var o = viewport.getLoaderImageOptions(imageId);
        o.requestType = 'thumbnail';
        o.preScale = { enabled: true };
        return o;
      },
      successCallback: function (imageId, image) {
        var full = image.imageQualityStatus === cs.Enums.ImageQualityStatus.FULL_RESOLUTION;
        load[full ? 'full' : 'preview'][imageId] = Date.now() - load.startedAt;
      },
      errorCallback: function (imageId, permanent) {
        if (permanent) {
          load.errors += 1;
        }
      },
    };
    var loader = cs.ProgressiveRetrieveImages.createProgressive({
      stages: STACK_STAGES, retrieveOptions: STACK_RETRIEVE_OPTIONS });
    loader.loadImages(ids, listener).then(function () { load.doneAt = Date.now(); });
  }

  // The viewport appears once OHIF has hung the protocol: look for it, then start once.
  setInterval(function () {
    var cs = window.cornerstone;
    if (!cs || !cs.getRenderingEngines || !cs.ProgressiveRetrieveImages) {
      return;
    }
    cs.getRenderingEngines().forEach(function (engine) {
      engine.getViewports().forEach(function (vp) {
        if (vp.type === 'stack' && vp.getCurrentImageId && vp.getCurrentImageId()) {
          startStackLoader(vp, cs);
        }
      });
    });
  }, 250);

  window.config = {
    name: 'appliance',
    routerBasename: '/',
    showStudyList: false,
    extensions: [applianceExtension],
    modes: [],
    // No splash ("investigational use") dialog and no onboarding tour.
    investigationalUseDialog: { option: 'never' },
    customizationService: { 'ohif.tours': { $set: [] } },
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    maxNumberOfWebWorkers: 3,
    // HTTP/1.1 with keep-alive: a few connections fetch frames in parallel.
    maxNumRequests: { interaction: 100, thumbnail: 10, prefetch: 10 },
    // The whole stack loads progressively after the first image (see STACK_STAGES), not
    // through OHIF's prefetcher, which would fetch every frame whole.
    studyPrefetcher: { enabled: false, displaySetsCount: 1, maxNumPrefetchRequests: 10,
                       order: 'closest' },
    defaultDataSourceName: 'appliance',
    dataSources: [
      {
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'appliance',
        configuration: {
          friendlyName: 'This appliance',
          name: 'appliance',
          wadoUriRoot: window.location.origin + '/dicom-web',
          qidoRoot: window.location.origin + '/dicom-web',
          wadoRoot: window.location.origin + '/dicom-web',
          qidoSupportsIncludeField: true,
          supportsReject: false,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: true,
          supportsWildcard: true,
          staticWado: false,
          singlepart: 'bulkdata,video',
          bulkDataURI: { enabled: true },
          omitQuotationForMultipartRequest: true,
        },
      },
    ],
    httpErrorHandler: function (error) {
      if (error && error.status === 401) {
        window.location.assign('/login?next=' + encodeURIComponent(
          window.location.pathname + window.location.search));
      }
    },
  };
})();
